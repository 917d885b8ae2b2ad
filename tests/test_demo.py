"""The demo page (``vlfuse demo MODEL``): its answers are ``vlfuse predict``'s, bad input is shown in the
page, and the page works in a real browser (Debian's headless Chromium driven by Selenium)."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState
from conftest import TINY_MODEL
from PIL import Image
from test_recipes import SMALL_DATA

from vlfuse.config import SHIPPED_CONFIGS, load_config
from vlfuse.demo import answer
from vlfuse.model import VLFuseModel
from vlfuse.predict import PredictError
from vlfuse.predict import main as predict_main
from vlfuse.training import train

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    found = {}
    # each task on its shipped config for the embedded data, tiny towers
    for task in ("grounding", "vqa", "itm", "retrieval"):
        out = tmp_path_factory.mktemp(task)
        AcceleratorState._reset_state(True)
        config = SHIPPED_CONFIGS / task / "shapes.yaml"
        train(load_config(config, [*TINY_MODEL, *SMALL_DATA, "train.max_steps=2", f"train.output_dir={out}"]))
        found[task] = out / "final"
    AcceleratorState._reset_state(True)
    return found


def _printed(capsys, *argv: str) -> list[str]:
    predict_main(list(argv))
    return [line for line in capsys.readouterr().out.splitlines() if not line.startswith("picture: ")]


@pytest.mark.parametrize(
    "task, text, images",
    [
        ("grounding", "the red box\nthe lowest shape", 1),
        ("vqa", "what colour is the shape?", 1),
        ("itm", "a red square\na blue circle", 1),
        ("retrieval", "a red square", 3),  # several images ranked for the text
    ],
)
def test_the_page_answers_what_predict_prints_and_names_bad_input(
    models, photo, tmp_path, capsys, task, text, images
):
    model = VLFuseModel.from_pretrained(models[task])
    paths = [str(photo)]
    for i in range(1, images):  # more photographs, the red patch moved
        path = tmp_path / f"photo{i}.png"
        image = Image.new("RGB", (96, 72), (20, 20, 20))
        image.paste((220, 30, 30), (10 + 20 * i, 12, 40 + 20 * i, 50))
        image.save(path)
        paths.append(str(path))
    pictures, lines = answer(model, paths[0] if images == 1 else paths, text, top_k=3)
    texts = text.splitlines()
    expected = _printed(
        capsys, str(models[task]), "--image", *paths, "--text", *texts, "--top-k", "3",
        "--output", str(tmp_path / "p.png"),
    )  # fmt: skip
    assert lines.splitlines() == expected and len(expected) >= len(texts)  # at least a line per text
    assert len(pictures) == (len(texts) if task == "retrieval" else 1)  # one picture per image or query
    junk = tmp_path / "notes.txt"
    junk.write_text("not an image")
    with pytest.raises(PredictError, match="notes.txt is not an image"):
        answer(model, str(junk), text)
    with pytest.raises(PredictError, match="give at least one --text"):
        answer(model, str(photo), "  \n ")
    with pytest.raises(PredictError, match="upload an image first"):
        answer(model, None, text)


def test_without_gradio_the_command_says_how_to_get_it(models, monkeypatch):
    from vlfuse.demo import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio now raises ModuleNotFoundError
    with pytest.raises(SystemExit, match=r'pip install "vlfuse\[demo\]"'):
        main([str(models["grounding"])])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # as Debian's Chromium runs headless as root on a machine with no network
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"]
    flags += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
    for flag in [*flags, "--window-size=1280,900"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.mark.slow
@pytest.mark.skipif(  # never in CI: .ci/run installs them and sets VLFUSE_REQUIRE_BROWSER
    (CHROMIUM is None or CHROMEDRIVER is None) and not os.environ.get("VLFUSE_REQUIRE_BROWSER"),
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them; apt-get install chromium "
    "chromium-driver)",
)
def test_the_page_in_a_real_browser_draws_predicts_answer_and_survives_a_bad_upload(
    models, photo, tmp_path, capsys
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(
        [sys.executable, "-m", "vlfuse", "demo", str(models["grounding"]), "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    browser = None
    try:
        deadline = time.time() + 120
        while True:  # until the server answers
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, server.stdout.read()
                time.sleep(0.5)
        browser = _browser()
        browser.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))

        def run(path: Path, text: str) -> None:
            browser.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(path))
            uploaded = f"#image td.filename[aria-label='{path.name}']"
            wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, uploaded))
            box = browser.find_element(By.CSS_SELECTOR, "#texts textarea")
            box.clear()
            box.send_keys(text)
            browser.find_element(By.ID, "run").click()

        def shown_answer() -> str:
            return browser.find_element(By.CSS_SELECTOR, "#answer textarea").get_attribute("value")

        # a file that is no image: the error is shown in the page
        junk = tmp_path / "notes.txt"
        junk.write_text("not an image")
        run(junk, "the red box")
        wait.until(lambda b: "notes.txt is not an image" in b.find_element(By.TAG_NAME, "body").text)
        # the server keeps serving: a real image next, whose answer is predict's
        browser.find_element(By.CSS_SELECTOR, "#image button[aria-label='Clear']").click()
        run(photo, "the red box")
        wait.until(lambda b: "box xyxy" in shown_answer())
        expected = _printed(
            capsys, str(models["grounding"]), "--image", str(photo), "--text", "the red box",
            "--output", str(tmp_path / "p.png"),
        )  # fmt: skip
        assert shown_answer().splitlines() == expected
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#pictures img"))  # the boxes drawn
        shot = Path(os.environ.get("VLFUSE_DEMO_SCREENSHOT", tmp_path / "demo.png"))
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        print(f"page answered {shown_answer()!r}; screenshot {shot}")
    finally:
        if browser is not None:
            browser.quit()
        server.terminate()
        server.wait(timeout=30)
