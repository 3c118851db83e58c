"""`tunelab ui`: a local web app to watch runs, read their reports, compare them and try their models.

app.py (routes, security), status.py (a run's status from its files), launch.py (start/stop runs),
playground.py (arms side by side, streamed), predictions.py (the predictions browser); templates/ and
static/ hold the pages, their CSS and JavaScript (served from the package: nothing from the network).
"""
