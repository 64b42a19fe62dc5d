from rest_framework.metadata import SimpleMetadata


class Metadata(SimpleMetadata):
    """OPTIONS answers name and description; the schema (/api/schema/) describes the rest.

    DRF's default also describes each view's serializer, which our views choose per method.
    """

    def determine_metadata(self, request, view):
        return {"name": view.get_view_name(), "description": view.get_view_description()}
