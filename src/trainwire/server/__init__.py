"""The trainwire server: ingest, storage, fan-out and the dashboard, on one port."""
