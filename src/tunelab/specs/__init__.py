"""The recipe's grader configs and the small languages they are written in, below config.py.

graders.py (typed grader configs in OpenAI's shapes, read from the recipe or a JSON/YAML file; the
YAML key -> line map of error messages), templates.py ({{ sample.* }}, {{ item.* }}: checked at
load time, rendered at grade time), formula.py (multi's calculate_output). config.py checks
eval.graders with them when a recipe loads; eval/graders/ runs them. User documentation:
docs/graders.md.
"""
