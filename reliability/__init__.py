"""The reliability suite (issue 11): hostile input, TLS refusals, faults and load against a
running ``xca-gateway demo``, with a report (``python -m reliability``)."""
