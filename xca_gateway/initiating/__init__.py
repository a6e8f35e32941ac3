"""The Initiating (Imaging) Gateway actor: a local consumer's ITI-18 fans out as ITI-38
(``query``), ITI-43 is routed as ITI-39 (``retrieve``), RAD-69 as RAD-75 (``imaging``); peer
health and patient-id mapping on the way."""
