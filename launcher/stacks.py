"""`python -m launcher.stacks RUN_DIR`: see launcher/cli/stacks.py."""

if __name__ == "__main__":
    import sys

    from launcher.cli.stacks import main

    sys.exit(main())
