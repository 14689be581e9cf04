"""pytest-svctunnel: extra L2 networks into a Kubernetes pod or node through a UDP Service."""

__version__ = "0.1.0"
