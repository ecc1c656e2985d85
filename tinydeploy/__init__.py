"""tinydeploy: grow compact networks with TINY and ship them to edge devices."""

__version__ = "0.1.0"
