"""The engine that runs an algorithm, one concern per module: the round loop
(:mod:`.loop`), handshake and registry (:mod:`.registry`), message flights
(:mod:`.exchange`), reply validation (:mod:`.replies`), costs (:mod:`.costs`),
carried evaluation (:mod:`.carry`) and progress lines (:mod:`.progress`)."""
