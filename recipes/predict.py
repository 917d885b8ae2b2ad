"""Single-image inference: a saved model (folder or Hub id), images and texts -> the answer and a picture.

    python recipes/predict.py runs/grounding/final --image photo.jpg --text "the red circle on the left"
    python recipes/predict.py runs/vqa/final --image photo.jpg --text "what colour is the shape?" --top-k 3
    python recipes/predict.py runs/retrieval/final --images-dir photos/ --text "a blue square" --top-k 5

Options: python recipes/predict.py --help (the same as python -m vlfuse.predict).
"""

from vlfuse.predict import main

if __name__ == "__main__":
    main()
