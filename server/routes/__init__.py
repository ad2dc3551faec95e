"""Thin route handlers, one file per resource: parse, call the serving layer, render."""
