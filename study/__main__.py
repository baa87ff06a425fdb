"""`python -m study`: the whole study (study/run.py; `python -m study --help` says what it does)."""

from study.run import main

if __name__ == "__main__":
    main()
