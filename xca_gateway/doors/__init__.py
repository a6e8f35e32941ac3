"""The doors: ways into the federation for systems that do not speak XDS (DIMSE, DICOMweb, HL7 v2
prefetch, import of priors), each over the federation as one view (``federation``)."""
