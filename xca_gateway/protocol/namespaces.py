"""XML namespaces and WS-Addressing action URIs used on the wire.

Values are the ones in the IHE WSDLs shipped in ``wsdl/`` (IHE ITI TF-2, RAD TF-2).
"""

from __future__ import annotations

SOAP12 = "http://www.w3.org/2003/05/soap-envelope"
SOAP11 = "http://schemas.xmlsoap.org/soap/envelope/"
WSA = "http://www.w3.org/2005/08/addressing"
XOP = "http://www.w3.org/2004/08/xop/include"
WSSE = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"

QUERY = "urn:oasis:names:tc:ebxml-regrep:xsd:query:3.0"
RIM = "urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0"
RS = "urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0"
LCM = "urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0"
XDSB = "urn:ihe:iti:xds-b:2007"
XDSI = "urn:ihe:rad:xdsi-b:2009"

WSA_ANONYMOUS = "http://www.w3.org/2005/08/addressing/anonymous"
WSA_FAULT_ACTION = "http://www.w3.org/2005/08/addressing/fault"
SOAP_FAULT_ACTION = "http://www.w3.org/2005/08/addressing/soap/fault"


class Action:
    """wsa:Action values of the transactions the gateway speaks."""

    ITI18 = "urn:ihe:iti:2007:RegistryStoredQuery"
    ITI18_RESPONSE = "urn:ihe:iti:2007:RegistryStoredQueryResponse"
    ITI38 = "urn:ihe:iti:2007:CrossGatewayQuery"
    ITI38_RESPONSE = "urn:ihe:iti:2007:CrossGatewayQueryResponse"
    ITI39 = "urn:ihe:iti:2007:CrossGatewayRetrieve"
    ITI39_RESPONSE = "urn:ihe:iti:2007:CrossGatewayRetrieveResponse"
    ITI43 = "urn:ihe:iti:2007:RetrieveDocumentSet"
    ITI43_RESPONSE = "urn:ihe:iti:2007:RetrieveDocumentSetResponse"
    RAD69 = "urn:ihe:rad:2009:RetrieveImagingDocumentSet"
    # RAD-69 answers with the ITI-43 response action (XDS-I.b WSDL).
    RAD69_RESPONSE = "urn:ihe:iti:2007:RetrieveDocumentSetResponse"
    RAD75 = "urn:ihe:rad:2011:CrossGatewayRetrieveImagingDocumentSet"
    RAD75_RESPONSE = "urn:ihe:rad:2011:CrossGatewayRetrieveImagingDocumentSetResponse"


class ResponseStatus:
    SUCCESS = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"
    FAILURE = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Failure"
    PARTIAL_SUCCESS = "urn:ihe:iti:2007:ResponseStatusType:PartialSuccess"


class ErrorSeverity:
    ERROR = "urn:oasis:names:tc:ebxml-regrep:ErrorSeverityType:Error"
    WARNING = "urn:oasis:names:tc:ebxml-regrep:ErrorSeverityType:Warning"
