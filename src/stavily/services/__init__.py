"""Loop services that start and stop with the app, one job each."""
