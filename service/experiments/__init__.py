"""The experiments resource: schemas, repository and routes."""
