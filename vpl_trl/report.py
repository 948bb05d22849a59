"""`python -m vpl_trl.report DIR...`: several runs' results side by side (see `vpl_trl.evaluation.report`)."""

from .evaluation.report import main

if __name__ == "__main__":
    main()
