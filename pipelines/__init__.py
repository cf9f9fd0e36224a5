"""Pipeline stages (one module each) plus config, tracking and metrics."""
