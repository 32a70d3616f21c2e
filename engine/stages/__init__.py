"""One module per stage: its command-line flags (``get_args_parser``, ``FLAG_RULES``) and
``run(args)``, the procedure the top-level script runs. ``main(argv)`` parses and runs; the
scripts at the repository root only call it."""
