"""`transferlab serve`: the local web app (routes in app.py, pages in templates/, scripts in static/)."""
