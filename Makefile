# Thin aliases for the scripts (which need only bash and python3).
.PHONY: demo test lint
demo:
	./scripts/demo.sh
test:
	./scripts/test.sh
lint:
	.venv/bin/ruff check .
