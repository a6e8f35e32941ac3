"""Wire plumbing, no IHE semantics: XML safety, SOAP 1.2 and MTOM (sans-IO), TLS, the HTTP server
that owns the TLS accept, the outbound HTTP and SOAP clients, and SOAP endpoint dispatch."""
