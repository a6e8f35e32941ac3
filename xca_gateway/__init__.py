"""xca-gateway: an IHE XCA-I federation gateway.

The package is organised sans-IO first: message models and transaction logic are plain
functions and data classes (``soap``, ``mtom``, ``xmlsafe``, ``transactions``), and the
network lives at the edges (``server``, ``client``).
"""

__version__ = "0.1.0"
