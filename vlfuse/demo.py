"""A demo page for a saved model: ``vlfuse demo MODEL`` (a folder or a Hub id) serves a Gradio app for its
task on 127.0.0.1 (nothing shared unless ``--share``):

- grounding: an image and expressions (one per line) -> the boxes drawn in colours, with the expressions;
- VQA-style classification: an image and a question -> the top answers with probabilities;
- matching: an image and texts -> each text's match probability;
- retrieval: several images and a text -> the top images as a gallery.

Every answer is ``vlfuse predict``'s for the same inputs (``vlfuse.predict.SHOW``). Bad input (a file that
is no image, an empty text) is shown in the page as an error, and the page keeps serving. Gradio is an
optional extra: ``pip install "vlfuse[demo]"``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlfuse.model import VLFuseModel
from vlfuse.predict import SHOW, Inputs, PredictError, add_loading_arguments, check_texts, read_image

INSTALL = 'the demo needs Gradio: pip install "vlfuse[demo]" (or: pip install gradio)'
# System fonts: the default theme's web fonts would be fetched from the internet by every browser.
FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
PROMPTS = {
    "grounding": ("expressions, one per line", "the red circle\nthe square left of the green triangle"),
    "vqa": ("questions, one per line", "what colour is the shape?"),
    "itm": ("texts to match, one per line", "a red circle\na blue square"),
    "retrieval": ("a text query (one per line for several)", "a red circle"),
}


def answer(model: VLFuseModel, files: Any, text: str, top_k: int = 5) -> tuple[list, str]:
    """The page's answer: the pictures ``vlfuse predict`` draws and the lines it prints (each image named
    by its file's name), for uploaded ``files`` (one path, or several) and ``text`` (one per line).

    Raises:
        PredictError: no image, a file that is no image, no text or an empty one.
    """
    paths = [files] if isinstance(files, str | os.PathLike) else list(files or [])
    if not paths:
        raise PredictError("upload an image first")
    images = [read_image(p) for p in paths]
    texts = check_texts([line.strip() for line in (text or "").splitlines() if line.strip()])
    inputs = Inputs(images, [Path(p).name for p in paths], texts, top_k)
    shown = SHOW[model.config.task](model, inputs)
    return shown.pictures, "\n".join(shown.lines)


def build_demo(model: VLFuseModel, title: str) -> Any:
    """The Gradio app (``gr.Blocks``) for ``model``'s task."""
    try:
        import gradio as gr
    except ModuleNotFoundError:
        raise SystemExit(INSTALL) from None
    task = model.config.task
    if task not in SHOW:
        raise SystemExit(f"the demo shows {', '.join(SHOW)} models, not {task!r}")
    label, example = PROMPTS.get(task, ("texts, one per line", ""))
    several = task == "retrieval"

    def run(files: Any, text: str, top_k: float) -> tuple[list, str]:
        try:
            pictures, lines = answer(model, files, text, int(top_k))
        except PredictError as err:
            raise gr.Error(str(err)) from None
        return pictures, lines

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"## {title}\n{_what(task)}")
        with gr.Row():
            with gr.Column():
                files = gr.File(
                    label="images" if several else "image",
                    file_count="multiple" if several else "single",
                    elem_id="image",
                )
                text = gr.Textbox(label=label, placeholder=example, lines=3, elem_id="texts")
                top_k = gr.Slider(1, 10, value=5, step=1, label="top k", visible=task != "grounding")
                button = gr.Button("Run", variant="primary", elem_id="run")
            with gr.Column():
                pictures = gr.Gallery(
                    label="answer", elem_id="pictures", columns=1, height=620, object_fit="contain"
                )
                lines = gr.Textbox(label="as vlfuse predict prints it", lines=6, elem_id="answer")
        button.click(run, [files, text, top_k], [pictures, lines])
    return demo


def _what(task: str) -> str:
    return {
        "grounding": "Upload an image and type expressions: each gets its box, drawn in its colour.",
        "vqa": "Upload an image and ask a question: the top answers with their probabilities.",
        "itm": "Upload an image and type texts: the probability that each describes the image.",
        "retrieval": "Upload several images and type a text: the images ranked by similarity.",
    }.get(task, "")


def parser(prog: str = "vlfuse demo") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Serves a Gradio demo page for a saved vlfuse model.")
    p.add_argument("model", help="a saved model folder (a run's final/) or a Hub model id")
    p.add_argument("--host", default="127.0.0.1", help="the address to serve on (default: loopback only)")
    p.add_argument("--port", type=int, default=7860, help="the port (default 7860)")
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    add_loading_arguments(p)
    return p


def main(argv: Sequence[str] | None = None, prog: str = "vlfuse demo") -> None:
    args = parser(prog).parse_args(argv)
    try:
        import gradio as gr  # said before the model loads
    except ModuleNotFoundError:
        raise SystemExit(INSTALL) from None

    model = VLFuseModel.from_pretrained(
        args.model, revision=args.revision, trust_remote_code=args.trust_remote_code
    )
    demo = build_demo(model, f"vlfuse {model.config.task}: {args.model}")
    print(f"serving the demo of {args.model} on http://{args.host}:{args.port} (Ctrl+C stops it)", flush=True)
    demo.queue().launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        theme=gr.themes.Default(font=FONTS, font_mono=["ui-monospace", "monospace"]),
        ssr_mode=False,  # no Node.js server beside Python
        quiet=True,
    )
