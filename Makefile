# The two commands of the README. Each sets up .venv on first use.
.PHONY: demo test lint setup clean-venv

setup:
	@bash scripts/setup-venv.sh

demo: setup
	./.venv/bin/tunelab run examples/triage/recipe.yaml

test:
	@bash scripts/setup-venv.sh test
	./.venv/bin/ruff check src tests bench examples
	./.venv/bin/lint-imports
	./.venv/bin/python -m pytest -q

lint:
	./.venv/bin/ruff check src tests bench examples
	./.venv/bin/lint-imports

clean-venv:
	rm -rf .venv
