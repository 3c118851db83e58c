"""Graders: judge each task by what the team cares about, with OpenAI-compatible grader configs.

specs.py (typed configs, read from the recipe or a JSON/YAML file), templates.py ({{ sample.* }},
{{ item.* }}), text.py (string_check, text_similarity), python_grader.py (grade(sample, item) in a
child process), judge.py (score_model, label_model, embeddings through an OpenAI-compatible
endpoint, cached), formula.py (multi's calculate_output), grade.py (a column of scores per grader),
human.py (judge/human agreement), evaluation.py (the checks before an evaluation generates, and
what it records about its graders). User documentation: docs/graders.md.
"""
