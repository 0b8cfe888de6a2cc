"""`python -m launcher.tokens`: see launcher/cli/tokens.py."""

if __name__ == "__main__":
    import sys

    from launcher.cli.tokens import main

    sys.exit(main())
