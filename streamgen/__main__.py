import sys

try:
    from streamgen.cli import main
except KeyboardInterrupt:  # a Ctrl-C as the command line loads, before main() handles its own
    print("interrupted", file=sys.stderr)
    exec("")  # (clears CPython's unhandled-Ctrl-C flag, set where it came up through an exec: see main)
    sys.exit(130)

sys.exit(main())
