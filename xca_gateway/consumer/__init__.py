"""The federation as a consumer system outside the gateway reaches it, over SOAP and mutual TLS:
``xca-gateway query`` / ``retrieve`` (``commands``, with readable stored queries in
``xds_query``), the imaging consumer flow (``imaging``: ``retrieve-study``, and the remote
federation of ``import-priors``), and a demo's ``endpoints.json`` (``endpoints_file``)."""
