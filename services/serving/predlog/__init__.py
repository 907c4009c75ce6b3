"""The durable prediction log: the journal each process writes, the shipper process that drains it
to the database, and the log's interface to the data plane."""
