# The two commands of the README. Each sets up .venv/ on first use (scripts/install-cpu.sh).
.PHONY: serve test install

install:
	@scripts/install-cpu.sh

serve: install
	.venv/bin/ead-server serve $(ARGS)

test: install
	.venv/bin/python -m pytest $(ARGS)
