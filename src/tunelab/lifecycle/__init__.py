"""Keeping a fine-tune alive after its first good run (`tunelab drift`, `update`, `rebase`; docs/lifecycle.md).

drift.py    is a run stale on today's data?          -> RUN/drift/<UTC time>/drift.json
update.py   continue a run with new examples         -> a new run whose manifest names its parent
rebase.py   the same recipe and data on a new base   -> a new run and a migration verdict
lineage.py  parent records, child runs and the paired comparisons both commands report
new_data.py the user's new examples, checked like training data
shift.py    input shift between two sets of inputs (for unlabelled new data)

Starting training from an existing adapter (recipe key model.adapter) is engine/adapter.py.
"""
