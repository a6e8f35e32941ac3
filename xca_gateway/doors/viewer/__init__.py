"""What the clinician sees: the IHE IID launch (RAD-106) and a zero-footprint viewer.

:mod:`~xca_gateway.doors.viewer.iid` parses launches and lists studies (sans I/O);
:mod:`~xca_gateway.doors.viewer.pages` serves the launch page and the viewer's files
(``static/``) on the web door. The viewer draws the DICOMweb door's lossless PNG renderings
(:mod:`xca_gateway.doors.dicomweb.rendered`).
"""
