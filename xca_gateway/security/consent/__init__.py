"""Patient consent to cross-community sharing: the rules and their store (``service``), what may
leave the community (``enforcement``), the responding handlers' guard (``guard``) and the
operator's CLI and admin API (``admin``)."""
