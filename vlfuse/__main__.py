"""``python -m vlfuse`` (and ``accelerate launch -m vlfuse``): the ``vlfuse`` command."""

from vlfuse.cli import main

if __name__ == "__main__":
    main()
