"""`python -m launcher.convert`: see launcher/cli/convert.py."""

if __name__ == "__main__":
    import sys

    from launcher.cli.convert import main

    sys.exit(main())
