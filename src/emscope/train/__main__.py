"""``python -m emscope.train`` / ``accelerate launch -m emscope.train BASE_DIR --data ...``:
the ``emscope train`` command alone (:func:`emscope.cli.train.main`)."""

from emscope.cli.train import main

if __name__ == "__main__":
    main()
