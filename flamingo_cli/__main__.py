"""`python -m flamingo_cli` runs the same app as the `flamingo` console script."""

from flamingo_cli.cli.app import main

if __name__ == "__main__":
    main()
