"""schemathesis hooks for dcp (schemathesis.toml loads this file).

dcp refuses a JSON body holding a "__proto__" key, or a "constructor" object with a "prototype" key,
anywhere in it (a 400 that says so: such keys can change the prototype of objects the server builds;
test/http/json-body.test.ts covers the refusal). The document cannot say so for the free-form values it
allows, so positive test cases drawing such a key are left out.
"""

import schemathesis

def _poisons_prototype(value):
    if isinstance(value, dict):
        if "__proto__" in value:
            return True
        if isinstance(value.get("constructor"), dict) and "prototype" in value["constructor"]:
            return True
        return any(_poisons_prototype(v) for v in value.values())
    if isinstance(value, list):
        return any(_poisons_prototype(v) for v in value)
    return False


@schemathesis.hook
def filter_body(ctx, body):
    return not _poisons_prototype(body)
