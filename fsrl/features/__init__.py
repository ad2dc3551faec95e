"""Readable SAE features: dashboards built offline from a corpus (`dashboards`), short labels
that record their source (`labels`), and search over both (`search`)."""
