"""Offline commands and the demo: ``xca-gateway demo``, ``import`` (studies as XDS-I.b
manifests), the development PKI's sample studies."""
