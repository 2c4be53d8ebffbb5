"""The `runwire` command line: the CLI (`cli`), its client of the gateway's API (`client`), the
doctor's checks (`doctor`) and terminal rendering (`render`). It may import the services and the demo;
the services and `shared` import nothing from here."""
