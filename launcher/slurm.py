"""`python -m launcher.slurm`: see launcher/cli/slurm.py."""

if __name__ == "__main__":
    import sys

    from launcher.cli.slurm import main

    sys.exit(main())
