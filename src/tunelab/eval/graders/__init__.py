"""Graders: judge each task by what the team cares about, with OpenAI-compatible grader configs.

The configs themselves, their templates and formulas are specs/ (below config.py, which checks them
when a recipe loads); this package runs them: text.py (string_check, text_similarity),
python_grader.py (grade(sample, item) in a child process), judge.py (score_model, label_model,
embeddings through an OpenAI-compatible endpoint, cached), samples.py (the {{ sample.* }} and
{{ item.* }} namespaces of one example), grade.py (a column of scores per grader), pairwise.py (a
pairwise judge), human.py (judge/human agreement), evaluation.py (the checks before an evaluation
generates, and what it records about its graders). User documentation: docs/graders.md.
"""
