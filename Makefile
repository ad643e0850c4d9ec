# The two commands a new user needs; both install what they need first.
.PHONY: run test bench

run:  ## Run the relay with the bundled page (OpenAI if OPENAI_API_KEY is set, else a local echo upstream)
	scripts/bootstrap.sh run
	.venv/bin/realtime-relay --demo

test:  ## Format check, lint, strict types and the whole test suite
	scripts/test.sh

bench:  ## Relay overhead figures against a direct connection and nginx
	scripts/bootstrap.sh test
	.venv/bin/python -m bench.relay
