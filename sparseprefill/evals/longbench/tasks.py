"""LongBench's task table: each task's prompt template, generation length, metric and language,
verbatim from THUDM's ``config/dataset2prompt.json``, ``config/dataset2maxlen.json`` and
``eval.py``; which tasks skip the chat template and which score only a prediction's first line.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FIRST_LINE_TASKS", "TASKS", "TASK_NAMES", "LongBenchTask", "get_task"]


# Tasks on which LongBench's pred.py does *not* wrap the prompt in the chat format: they are
# few-shot or code-completion prompts whose answer should continue the text directly.
NO_CHAT_TEMPLATE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
# Tasks whose predictions eval.py cuts to their first non-empty line before scoring (few-shot
# prompts: a model tends to go on writing the next example).
FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht"})

LANGUAGE_EN = "en"
LANGUAGE_ZH = "zh"
LANGUAGE_CODE = "code"

METRIC_QA_F1 = "qa_f1_score"
METRIC_QA_F1_ZH = "qa_f1_zh_score"
METRIC_ROUGE = "rouge_score"
METRIC_ROUGE_ZH = "rouge_zh_score"
METRIC_CLASSIFICATION = "classification_score"
METRIC_RETRIEVAL = "retrieval_score"
METRIC_RETRIEVAL_ZH = "retrieval_zh_score"
METRIC_COUNT = "count_score"
METRIC_CODE_SIM = "code_sim_score"

_MULTI_DOC_QA_TEMPLATE = (
    "Answer the question based on the given passages. Only give me the answer and do not output "
    "any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based "
    "on the given passages. Only give me the answer and do not output any other words.\n\n"
    "Question: {input}\nAnswer:"
)

# name -> (prompt template, max new tokens, metric, language). Templates are str.format strings
# with {context} and (for most tasks) {input}, verbatim from LongBench/config/dataset2prompt.json;
# the numbers are LongBench/config/dataset2maxlen.json; metrics are eval.py's dataset2metric.
_TABLE: dict[str, tuple[str, int, str, str]] = {
    "narrativeqa": (
        # "asconcisely" (sic) is in THUDM's official config; kept so prompts match exactly.
        "You are given a story, which can be either a novel or a movie script, and a question. "
        "Answer the question asconcisely as you can, using a single phrase if possible. Do not "
        "provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the "
        "story asconcisely as you can, using a single phrase if possible. Do not provide any "
        "explanation.\n\nQuestion: {input}\n\nAnswer:",
        128, METRIC_QA_F1, LANGUAGE_EN,
    ),
    "qasper": (
        "You are given a scientific article and a question. Answer the question as concisely as "
        "you can, using a single phrase or sentence if possible. If the question cannot be "
        "answered based on the information in the article, write \"unanswerable\". If the "
        "question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not "
        "provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above "
        "article as concisely as you can, using a single phrase or sentence if possible. If the "
        "question cannot be answered based on the information in the article, write "
        "\"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or "
        "\"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
        128, METRIC_QA_F1, LANGUAGE_EN,
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following "
        "question based on the above text, only give me the answer and do not output any other "
        "words.\n\nQuestion: {input}\nAnswer:",
        64, METRIC_QA_F1, LANGUAGE_EN,
    ),
    "multifieldqa_zh": (
        "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，"
        "只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答：",
        64, METRIC_QA_F1_ZH, LANGUAGE_ZH,
    ),
    "hotpotqa": (_MULTI_DOC_QA_TEMPLATE, 32, METRIC_QA_F1, LANGUAGE_EN),
    "2wikimqa": (_MULTI_DOC_QA_TEMPLATE, 32, METRIC_QA_F1, LANGUAGE_EN),
    "musique": (_MULTI_DOC_QA_TEMPLATE, 32, METRIC_QA_F1, LANGUAGE_EN),
    "dureader": (
        "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n"
        "问题：{input}\n回答：",
        128, METRIC_ROUGE_ZH, LANGUAGE_ZH,
    ),
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the report."
        "\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
        512, METRIC_ROUGE, LANGUAGE_EN,
    ),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. "
        "Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the "
        "query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}"
        "\nAnswer:",
        512, METRIC_ROUGE, LANGUAGE_EN,
    ),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n"
        "{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",
        512, METRIC_ROUGE, LANGUAGE_EN,
    ),
    "vcsum": (
        "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n"
        "会议总结：",
        512, METRIC_ROUGE_ZH, LANGUAGE_ZH,
    ),
    "trec": (
        "Please determine the type of the question below. Here are some examples of questions."
        "\n\n{context}\n{input}",
        64, METRIC_CLASSIFICATION, LANGUAGE_EN,
    ),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not "
        "output any other words. The following are some examples.\n\n{context}\n\n{input}",
        32, METRIC_QA_F1, LANGUAGE_EN,
    ),
    "samsum": (
        "Summarize the dialogue into a few short sentences. The following are some examples."
        "\n\n{context}\n\n{input}",
        128, METRIC_ROUGE, LANGUAGE_EN,
    ),
    "lsht": (
        "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
        64, METRIC_CLASSIFICATION, LANGUAGE_ZH,
    ),
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. "
        "Please carefully read these paragraphs and determine how many unique paragraphs there "
        "are after removing duplicates. In other words, how many non-repeating paragraphs are "
        "there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after "
        "removing duplicates. The output format should only contain the number, such as 1, 2, "
        "3, and so on.\n\nThe final answer is: ",
        32, METRIC_COUNT, LANGUAGE_EN,
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which "
        "paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}"
        "\n\nPlease enter the number of the paragraph that the abstract is from. The answer "
        "format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",
        32, METRIC_RETRIEVAL, LANGUAGE_EN,
    ),
    "passage_retrieval_zh": (
        "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n"
        "下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式"
        "\n\n答案是：",
        32, METRIC_RETRIEVAL_ZH, LANGUAGE_ZH,
    ),
    "lcc": (
        "Please complete the code given below. \n{context}Next line of code:\n",
        64, METRIC_CODE_SIM, LANGUAGE_CODE,
    ),
    "repobench-p": (
        "Please complete the code given below. \n{context}{input}Next line of code:\n",
        64, METRIC_CODE_SIM, LANGUAGE_CODE,
    ),
}


@dataclass(frozen=True)
class LongBenchTask:
    """One LongBench task: how to prompt for it and how to score it.

    Attributes:
        name: LongBench's dataset name (also the ``{name}.jsonl`` file name).
        prompt_template: ``str.format`` template with ``{context}`` and, for most tasks,
            ``{input}``.
        max_new_tokens: greedy generation length LongBench uses for the task.
        metric: name of the metric function in :data:`METRICS`.
        chat_template: whether LongBench wraps the prompt in the model's chat format.
        language: ``"en"``, ``"zh"`` or ``"code"``.
    """

    name: str
    prompt_template: str
    max_new_tokens: int
    metric: str
    chat_template: bool
    language: str

    @property
    def first_line_only(self) -> bool:
        """Whether eval.py scores only the first line of a prediction for this task."""
        return self.name in FIRST_LINE_TASKS


TASKS: dict[str, LongBenchTask] = {
    name: LongBenchTask(
        name=name,
        prompt_template=template,
        max_new_tokens=max_new,
        metric=metric,
        chat_template=name not in NO_CHAT_TEMPLATE_TASKS,
        language=language,
    )
    for name, (template, max_new, metric, language) in _TABLE.items()
}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def get_task(task: str | LongBenchTask) -> LongBenchTask:
    """The :class:`LongBenchTask` for a name (or the task itself), with a clear error if unknown."""
    if isinstance(task, LongBenchTask):
        return task
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(
            f"unknown LongBench task {task!r}; known tasks: {', '.join(TASK_NAMES)}"
        ) from None
