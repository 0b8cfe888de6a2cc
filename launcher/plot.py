"""`python -m launcher.plot`: see launcher/cli/plot.py."""

if __name__ == "__main__":
    import sys

    from launcher.cli.plot import main

    sys.exit(main())
