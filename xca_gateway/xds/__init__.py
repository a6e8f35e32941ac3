"""The XDS vocabulary and document model, sans-IO: ebRIM/ebRS, document metadata, KOS imaging
manifests and CX patient identifiers."""
