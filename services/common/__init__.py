"""Code shared by every Postbus service: settings, topic names, Avro codec, secrets, logging."""
