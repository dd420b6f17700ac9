# Shortcuts for the README's commands.
.PHONY: demo demo-quick test

demo:  ## agent vs CoT distillation on a generated world (~1 h 40 min on 2 cores), into attar-demo/
	attar demo --out attar-demo

demo-quick:  ## the same pipeline on a tiny model and world (a few minutes)
	attar demo --quick --out attar-demo-quick

test:
	python -m pytest -q
