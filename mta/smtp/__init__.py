"""The SMTP server: listeners (`server`), sessions (`session`), DATA/BDAT
(`data`), ESMTP parameters (`esmtp`), TLS (`tls`) and AUTH (`auth`)."""
