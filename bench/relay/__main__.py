"""`python -m bench.relay`: the relay benchmark's command line (see `bench.relay`)."""

from bench.relay.cli import main

main()
