"""`python -m launcher ...` and `torchrun ... -m launcher ...`: see launcher/cli/main.py."""

if __name__ == "__main__":  # first, before torch's import: a stop signal meanwhile is kept, not fatal
    from launcher.distributed import early_signals

    early_signals.hold()

    from launcher.cli.main import exit_process, main

    exit_process(main())
